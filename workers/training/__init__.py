"""LoRA fine-tuning: datasets, checkpoints, the training loop and one trainer per target.

Nothing here imports torch at import time; the finetune worker (``imageq.workers.kinds.finetune``)
puts the pieces together for one job.
"""
