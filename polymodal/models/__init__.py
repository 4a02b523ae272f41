"""Model families: towers, dual encoders and the method-specific models built from them."""
