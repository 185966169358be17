"""Weight formats: PyTorch/transformers/diffusers layouts to our params trees and back (numpy only)."""
