"""The model of the custom example: a small CNN for 8x8 grey images, 10 classes.

FLQ calls `build()` with no arguments on the master and on every worker, and adds its own
optimizer and loss: return the model uncompiled, ending in softmax probabilities.
"""

import keras


def build() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="small_cnn",
    )
