"""Device meshes and the map from lcm's logical axis names onto mesh axes."""
