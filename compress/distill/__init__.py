"""Knowledge distillation: teacher -> student, on one machine or under accelerate/torchrun."""
