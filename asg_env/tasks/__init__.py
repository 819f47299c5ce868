"""Syn→real tasks and their data.

``registry`` turns a task's name into a seeded stream of synthetic training batches, a fixed
held-out synthetic set and the real target set; the other modules read one dataset each (the
embedded SynDigits and SynDigitScenes, VisDA-17, GTA5→Cityscapes, your own folders) and the 20
ImageNet photos that measure what the student keeps of ImageNet.
"""
