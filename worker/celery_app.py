"""The worker's Celery app (`celery -A worker.celery_app worker -P prefork -c 1 -Q predict,adapt,meta`):
contract/queues.py's app with the worker's tasks. Prefork so time limits apply and a crashed child
is noticed; the model loads in the child."""

from contract.queues import make_celery

app = make_celery(include=["worker.tasks"])
