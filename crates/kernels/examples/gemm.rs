fn main() {
    let isas = fedllm_kernels::isa::available();
    for r in fedllm_kernels::bench::bench_gemm(1024, &isas, 3).unwrap() {
        println!("{:12} {}x{}x{}: {:?}", r.what, r.m, r.k, r.n, r.gflops);
    }
}
