"""stillroom's stages, in the order data flows through them:
core < data, views, training < teachers, store < labeling.
"""
