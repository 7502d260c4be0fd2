"""Judging generated samples and what they cost: LeNet metrics (FD-LeNet, accuracy), sampling
and timing, per-checkpoint reports, the strategy comparison and the results table."""
