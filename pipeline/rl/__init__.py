"""Online RL trainers built on TRL's public trainers (see cppo_trainer.py)."""

from pipeline.rl.cppo_trainer import CPPOConfig, CPPOTrainer, cppo_weights, kr_loss

__all__ = ["CPPOConfig", "CPPOTrainer", "cppo_weights", "kr_loss"]
