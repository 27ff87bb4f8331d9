"""The contract between the API (app/) and the workers (worker/): the records in Redis, the blob
stores, the queues and task names, the configuration fingerprint and the job config. Both sides
import it and never each other; nothing here imports torch (tests/test_contract.py checks both)."""
