"""Pure linen modules: towers, heads and masking of SyCoCa."""
