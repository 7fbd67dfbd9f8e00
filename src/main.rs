fn main() {
    dcam_stream::main();
}
