//! Neural-network layers (being written).
