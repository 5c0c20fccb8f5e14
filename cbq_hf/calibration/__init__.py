"""Calibration: turn the float decoder linears of a loaded model into packed `CBQLinear` modules."""
