"""Hand-written kernels of the TVM backend, one module per family: integer matmuls
(:mod:`.matmul`), their scheduled int8 forms (:mod:`.vnni` on x86, :mod:`.dot` on
aarch64, with :mod:`.intrinsics`), integer convolutions (:mod:`.conv`) and the fused
integer softmax (:mod:`.softmax`)."""
