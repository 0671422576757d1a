//! Cost of classifying typical statements: the budget is well under a microsecond each.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgvigil_proto::classify::{classify, FunctionLists};

/// pgbench's `-S` statement.
const PGBENCH_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";

/// pgbench's write statement.
const PGBENCH_INSERT: &str =
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);";

/// An analytical query of about 1 KiB: CTE, joins, aggregates, window functions, comments.
const ANALYTICAL: &str = "/* monthly revenue report */
WITH recent_orders AS (
    SELECT o.id, o.customer_id, o.created_at, o.total_amount, o.status
    FROM orders o
    WHERE o.created_at >= date_trunc('month', now()) - interval '12 months'
      AND o.status IN ('paid', 'shipped', 'delivered')
), customer_totals AS (
    SELECT c.id AS customer_id, c.country, c.segment,
           count(r.id) AS order_count, sum(r.total_amount) AS revenue,
           avg(r.total_amount) AS avg_order, max(r.created_at) AS last_order
    FROM customers c
    JOIN recent_orders r ON r.customer_id = c.id
    LEFT JOIN customer_flags f ON f.customer_id = c.id AND f.flag = 'test'
    WHERE f.customer_id IS NULL
    GROUP BY c.id, c.country, c.segment
)
SELECT ct.country, ct.segment,
       to_char(date_trunc('month', r.created_at), 'YYYY-MM') AS month,
       count(DISTINCT ct.customer_id) AS customers,
       sum(ct.revenue) AS revenue,
       round(avg(ct.avg_order)::numeric, 2) AS avg_order,
       rank() OVER (PARTITION BY ct.country ORDER BY sum(ct.revenue) DESC) AS country_rank,
       coalesce(string_agg(DISTINCT ct.segment, ', '), '-') AS segments
FROM customer_totals ct
JOIN recent_orders r ON r.customer_id = ct.customer_id
WHERE ct.order_count > 1 AND lower(ct.country) <> 'xx'
GROUP BY ct.country, ct.segment, month
HAVING sum(ct.revenue) > 1000
ORDER BY ct.country, month DESC, revenue DESC
LIMIT 500;";

fn classify_typical(c: &mut Criterion) {
    let lists = FunctionLists::new(["audit_log"], ["my_read"]);
    // The figures only mean something if the verdicts are the expected ones.
    assert!(classify(PGBENCH_SELECT.as_bytes(), &lists).read_only);
    assert!(classify(ANALYTICAL.as_bytes(), &lists).read_only);
    assert!(!classify(PGBENCH_INSERT.as_bytes(), &lists).read_only);
    let mut group = c.benchmark_group("classify");
    for (name, sql) in [
        ("pgbench_select", PGBENCH_SELECT),
        ("pgbench_insert", PGBENCH_INSERT),
        ("analytical_1k", ANALYTICAL),
    ] {
        group.throughput(Throughput::Bytes(sql.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| classify(black_box(sql.as_bytes()), &lists).read_only)
        });
    }
    group.finish();
}

criterion_group!(benches, classify_typical);
criterion_main!(benches);
