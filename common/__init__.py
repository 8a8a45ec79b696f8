"""Math and protocol shared by site and coordinator: pure, Flower-free functions."""
