"""Splatting operators split over the members of an aggregate device (projection + SH, tile
intersection, rasterization forward/backward, the L1 + SSIM loss), each member working on the part it
holds, every cross-member transfer counted by the exchange module."""
