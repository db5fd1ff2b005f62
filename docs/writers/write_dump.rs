// A minimal workbench-dump/1 writer in Rust with the `safetensors` crate (Cargo.toml: safetensors = "0.4").
// The demo writes the same numbers as write_dump.py and write_dump.cpp (a function of their position).
use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Little-endian bytes of f32 values (row-major, rows first: [T, n_heads, head_dim], [T, hidden], …).
fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn i64_bytes(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).expect("usage: write_dump OUT.safetensors");
    let (hidden, k, n_prompt) = (8usize, 2usize, 3usize);
    let tokens: Vec<i64> = vec![1, 5, 9, 4]; // every token fed, prompt first

    let rows: Vec<f32> = (0..n_prompt * hidden).map(|i| 0.25 * i as f32 - 1.0).collect();
    let row: Vec<f32> = (0..hidden).map(|i| -0.5 * i as f32).collect();
    let (rows, row, ids) = (f32_bytes(&rows), f32_bytes(&row), i64_bytes(&[3, 1]));

    let mut tensors: HashMap<String, TensorView> = HashMap::new();
    // "{step}/{capture}": step 0 is the prompt as one batch, step s ≥ 1 one token at position n_prompt + s − 1.
    tensors.insert("0/blocks.0.attn_norm".into(), TensorView::new(Dtype::F32, vec![n_prompt, hidden], &rows)?);
    tensors.insert("1/blocks.0.resid_post".into(), TensorView::new(Dtype::F32, vec![1, hidden], &row)?);
    tensors.insert("1/blocks.0.moe.topk_ids".into(), TensorView::new(Dtype::I64, vec![1, k], &ids)?);

    let token_list: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let metadata: HashMap<String, String> = HashMap::from([
        ("format".to_string(), "workbench-dump/1".to_string()),
        ("tokens".to_string(), format!("[{}]", token_list.join(","))),
        ("n_prompt".to_string(), n_prompt.to_string()),
        ("engine".to_string(), "rust demo".to_string()),
    ]);
    serialize_to_file(&tensors, &Some(metadata), Path::new(&out))?;
    Ok(())
}
