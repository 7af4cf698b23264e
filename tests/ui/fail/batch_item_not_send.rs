use std::marker::PhantomData;

use rmq_consumer::consumer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Local {
    text: String,
    #[serde(skip)]
    _not_send: PhantomData<*const ()>,
}

#[consumer(queue = "tasks", batch = 8, blocking)]
fn handle(items: Vec<Local>) -> Vec<usize> {
    items.iter().map(|item| item.text.len()).collect()
}

fn main() {}
