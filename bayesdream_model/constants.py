"""Plate and site names, and the fixed dims the plates live at, in one place.

Shapes: the sample dimension (when there is one) is on the left; the feature plate
is always the rightmost batch dim of a site, the group plate the one to its left.
"""

FEATURE_PLATE = "features"  # T fit features
GROUP_PLATE = "groups"  # C - 1 non-baseline groups
CELL_PLATE = "cells"  # N fit cells
CATEGORY_PLATE = "categories"  # K categories (multinomial)

FEATURE_DIM = -1
GROUP_DIM = -2
CELL_DIM = -2

OBS_SITE = "y"

# Numerical floors of the model (docs/model.md).
EPSILON = 1e-6
LOG_EPS = 1e-8
