fn main() {
    let exit = docker_delete::run(std::env::args_os().collect());
    std::process::exit(exit as i32);
}
