"""fedlora.simulations: many sites on one machine, on Flower's simulation engine (Ray)."""
