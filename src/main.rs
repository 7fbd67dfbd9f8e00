fn main() {
    dcam_stream::cli::main();
}
