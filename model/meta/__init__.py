"""Meta-training (MAML-en-LLM, first-order MAML, Reptile, MetaICL), one module per concern: tasks, episodes,
method (a task's meta-gradient), batching, forward, outer (MetaTrainer), checkpoint, run, cli.
`model.meta_train` re-exports the public names and is the command line."""
