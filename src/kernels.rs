//! Candle glue for the kernels in `rest-kernels` (being written).
