"""Input data: TFDS + tf.data pipelines, the built-in digits dataset, encoded latents."""
