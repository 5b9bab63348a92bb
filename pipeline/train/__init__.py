"""Recovery fine-tuning: knowledge distillation from the unpruned model."""
