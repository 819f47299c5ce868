"""Unsupervised domain adaptation after ASG fine-tuning: class-balanced and confidence-regularised
self-training (CBST, CRST) on the unlabelled real target (ASG Table 4)."""
