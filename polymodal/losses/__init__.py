"""Losses: pure functions first, thin nn.Modules second (contrastive.py: InfoNCE in every gather mode and SigLIP)."""
