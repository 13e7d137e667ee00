//! The `qgjob` command line.

fn main() {
    println!("qgjob");
}
