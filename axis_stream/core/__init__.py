"""The numerical core: tensors in, tensors out; no files, no logging, no configuration.

``svd`` (exact and certified randomized truncated SVDs), ``stage1`` (AXIS's top-K merge and the
streaming fold), ``merges`` (the alternative Stage 1 merges), ``layout`` (which parameters are
matrices), ``registry`` (the one name -> entry registry they all use).
"""
