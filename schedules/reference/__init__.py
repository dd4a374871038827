"""NumPy references of qoqc's kernels, one module per kernel family (the kernel's own module says
what its reference checks). They import NumPy and qoqc's leaf modules only, never TVM, so the GPU
test lane runs them on a machine that has TVM's runtime libraries and no compiler."""
