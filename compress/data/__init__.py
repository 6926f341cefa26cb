"""Text for calibration and evaluation: built-in, local files, or datasets."""
