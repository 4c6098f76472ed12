"""The DiNa-LRM latent reward model: backbone (first N SD3 blocks), reward head, scoring API."""
