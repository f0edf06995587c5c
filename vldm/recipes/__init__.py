"""Training recipes: the shapes recipe's tasks (autoencoder, temporal decoder, latent diffusion)
for `vldm.train`, named in configs/shapes.py as 'vldm.recipes.<module>:<Task>'."""
