"""The training core: proxy-guided fine-tuning with one learning rate per optimization coordinate.

The backbones and their coordinates, proxy guidance and the regularisers beside it, the
optimizer of the official release, the task kinds (classification, segmentation) that build the
student and measure it, the teacher's logit caches, and the trainer that runs one fine-tuning
run (or N of one configuration as one batched model) one learning-rate decision at a time.
Nothing here knows about Gymnasium or agents.
"""
