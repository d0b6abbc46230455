"""fedlora.simulations"""
