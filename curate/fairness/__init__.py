"""Demographic bias: attribute inference, bias metrics, M4 and resampling, counterfactuals."""
