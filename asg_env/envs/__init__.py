"""The Gymnasium face of the trainer: the env, its native vector env, and what they read.

``env`` and ``vector`` wrap the training core as ``gymnasium.Env`` and
``gymnasium.vector.VectorEnv``; ``control`` is the action, observation and reward layer between
trainer and agent; ``settings`` holds every setting's type and range; ``instances`` draws the
instance families and files that L2O benchmarks train and test on.
"""
