use rmq_consumer::consumer;

struct Prompt {
    text: String,
}

#[consumer(queue = "tasks", batch = 8)]
async fn infer(prompts: Vec<Prompt>) -> Vec<()> {
    prompts.iter().map(|p| drop(p.text.len())).collect()
}

fn main() {}
