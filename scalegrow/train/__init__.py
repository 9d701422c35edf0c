"""Training: DeepSpeed ZeRO pretraining from scratch, and grow-then-train (LEMON, LiGO).
`launch/*.py` call `scalegrow.train.launch.main`."""
