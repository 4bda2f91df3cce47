"""GRPO training on reasoning-gym tasks with veRL: data, rewards, curriculum, the upload hook, the CPU plugin."""
