"""Evaluation of synthetic data by the paper's protocol: downstream classifiers trained on samples and
tested on real data, FID from Inception-v3 pool features, and a classifier trained directly with DP-SGD.

``samples`` (reading and checking SAMPLES.npz) -> ``downstream`` (``classifiers``) / ``fid``
(``inception``, ``frechet``) -> ``report``; ``dp_baseline`` trains the same CNN with our PrivacyEngine.
"""
