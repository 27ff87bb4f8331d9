"""mamlserve's ML library: loading, prompts, scoring, adaptation, meta-training, evaluation."""

import os

# libgomp's threads spin while they wait for work. Two torch processes on 2 cores (a worker
# beside a test run, two workers, a bench beside anything) then slow each other down ~10x: a
# SmolLM2 training step took 30-40 s instead of 2-4 s next to a test run. Waiting passively
# costs little when alone. It must be set before torch loads OpenMP, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
