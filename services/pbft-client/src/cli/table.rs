//! Plain-text tables for `pbft status` and the `pbft up` view: every column as wide as
//! its widest cell, so rows line up whatever the numbers grow to.
//!
//! Cells are strings on purpose. A `serde_json::Value` ignores `{:<5}`-style widths when
//! displayed, which once shifted the view and primary columns of both tables.

use serde_json::Value;

/// `header` and `rows` as left-aligned columns two spaces apart, one line each; the last
/// column is not padded. A row shorter than the header leaves its last cells empty; one
/// longer than it (a note after the last column) gets columns of its own.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).fold(header.len(), usize::max);
    let mut widths = vec![0; columns];
    for (w, h) in widths.iter_mut().zip(header) {
        *w = h.chars().count();
    }
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            let cell = row.get(i).map_or("", String::as_str);
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A number from a replica's `/status` document as a cell, or `-` where it is missing or
/// not a number.
pub fn number(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".into(), |n| n.to_string())
}

/// A replica id from a `/status` document as a cell (`r1`), or `-`.
pub fn replica(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".into(), |n| format!("r{n}"))
}

/// How many of the peers in a replica's `/status` document it is connected to.
pub fn connected_peers(status: &Value) -> usize {
    status["peers"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|p| p["connected"] == true).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Where each cell of `line` starts: runs of two or more spaces separate cells.
    fn starts(line: &str) -> Vec<usize> {
        let mut out = vec![0];
        let b = line.as_bytes();
        for i in 2..b.len() {
            if b[i] != b' ' && b[i - 1] == b' ' && b[i - 2] == b' ' {
                out.push(i);
            }
        }
        out
    }

    #[test]
    fn columns_line_up_with_the_header_whatever_the_widths() {
        let rows = vec![
            vec!["r0".into(), "0".into(), "r0".into(), "7".into()],
            vec![
                "r1".into(),
                "12345".into(),
                "r1".into(),
                "1234567890123".into(),
            ],
        ];
        let text = render(&["replica", "view", "primary", "height"], &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let header = starts(lines[0]);
        assert_eq!(header.len(), 4);
        for line in &lines[1..] {
            assert_eq!(starts(line), header, "{text}");
        }
        assert!(text.lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn short_rows_and_wide_last_cells() {
        let rows = vec![
            vec!["r0".into(), "-".into(), "down (127.0.0.1:7001)".into()],
            vec!["r1".into()],
        ];
        let text = render(&["replica", "view", "state"], &rows);
        assert_eq!(
            text,
            "replica  view  state\nr0       -     down (127.0.0.1:7001)\nr1\n"
        );
        let rows = vec![
            vec!["r0".into(), "down".into(), "-".into(), "signal: 9".into()],
            vec!["r1".into(), "up".into(), "12".into()],
        ];
        assert_eq!(
            render(&["replica", "state", "lag"], &rows),
            "replica  state  lag\nr0       down   -    signal: 9\nr1       up     12\n"
        );
    }

    #[test]
    fn status_values_become_plain_cells() {
        let s = json!({"view": 3, "primary": 3, "height": 17, "nothing": null});
        assert_eq!(number(&s["view"]), "3");
        assert_eq!(replica(&s["primary"]), "r3");
        assert_eq!(number(&s["nothing"]), "-");
        assert_eq!(number(&s["absent"]), "-");
        assert_eq!(replica(&json!("x")), "-");
        let peers = json!({"peers": [{"connected": true}, {"connected": false}, {}]});
        assert_eq!(connected_peers(&peers), 1);
        assert_eq!(connected_peers(&json!({})), 0);
    }
}
