"""genprior: fit generative image priors (DGP, mGANprior, DIP) to degraded images."""
__version__ = "0.1.0"
