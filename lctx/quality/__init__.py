"""What KV-cache compression costs in quality: tasks with known answer
positions (tasks, synthetic), a tiny model trained here (train), and the
evaluation of every compression policy on them (evaluate)."""
