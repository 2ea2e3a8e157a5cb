"""Hydra configs of attnlib-train (a package so Hydra can find them wherever attnlib is installed)."""
