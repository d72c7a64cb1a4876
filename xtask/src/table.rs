//! Plain-text tables for the summaries every long command ends with.

/// A table printed with columns padded to their widest cell.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells print empty, extra cells are kept).
    pub fn row(&mut self, cells: &[&str]) {
        self.rows
            .push(cells.iter().map(|s| (*s).to_owned()).collect());
    }

    /// Renders the table, one line per row, with a rule under the header.
    pub fn render(&self) -> String {
        let cols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let width = |i: usize| {
            self.rows
                .iter()
                .chain([&self.header])
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..cols).map(width).collect();
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                s.push_str(&format!("{cell:<w$}  "));
            }
            s.trim_end().to_owned() + "\n"
        };
        let mut out = line(&self.header);
        out.push_str(&line(
            &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
        ));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_to_the_widest_cell() {
        let mut t = Table::new(&["tool", "version"]);
        t.row(&["helm", "v3.22.0"]);
        t.row(&["kube-apiserver", "v1.35.4"]);
        assert_eq!(
            t.render(),
            "tool            version\n\
             --------------  -------\n\
             helm            v3.22.0\n\
             kube-apiserver  v1.35.4\n"
        );
    }
}
