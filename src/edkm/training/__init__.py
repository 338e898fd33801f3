"""Fine-tuning: ``loop`` (AdamW, schedule, accumulation, clipping, checkpoint/resume, DDP), ``finetune`` (cross-entropy
and distillation from a teacher) and ``synthetic`` (data-free distillation sequences written by the model)."""
