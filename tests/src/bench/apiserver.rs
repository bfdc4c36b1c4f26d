//! Requests kube-apiserver served, from its own counter `apiserver_request_total` (its
//! `/metrics`, read as an admin), grouped as reads (GET, LIST), watches (WATCH) and
//! writes (every other verb: POST, PUT, PATCH, APPLY, DELETE, ...).

use std::collections::BTreeMap;

use super::raw::Error;

/// Requests by verb, as the counter stood (or, after [`Requests::since`], a difference).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Requests {
    by_verb: BTreeMap<String, f64>,
}

impl Requests {
    /// Sums `apiserver_request_total` by verb in a `/metrics` text.
    pub fn parse(metrics: &str) -> Result<Requests, Error> {
        let lines = metrics.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines)?;
        let mut by_verb = BTreeMap::new();
        for s in scrape
            .samples
            .iter()
            .filter(|s| s.metric == "apiserver_request_total")
        {
            let prometheus_parse::Value::Counter(n) = s.value else {
                continue;
            };
            let verb = s.labels.get("verb").unwrap_or("").to_string();
            *by_verb.entry(verb).or_insert(0.0) += n;
        }
        Ok(Requests { by_verb })
    }

    /// The counter as the apiserver of `client` has it now.
    pub async fn scrape(client: &kube::Client) -> Result<Requests, Error> {
        let req = http::Request::get("/metrics").body(Vec::new())?;
        Requests::parse(&client.request_text(req).await?)
    }

    /// What was served since `before`.
    pub fn since(&self, before: &Requests) -> Requests {
        let by_verb = self
            .by_verb
            .iter()
            .map(|(v, n)| (v.clone(), n - before.by_verb.get(v).copied().unwrap_or(0.0)))
            .filter(|(_, n)| *n > 0.0)
            .collect();
        Requests { by_verb }
    }

    fn sum(&self, pick: impl Fn(&str) -> bool) -> f64 {
        self.by_verb
            .iter()
            .filter(|(v, _)| pick(v))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn reads(&self) -> f64 {
        self.sum(|v| matches!(v, "GET" | "LIST"))
    }

    pub fn watches(&self) -> f64 {
        self.sum(|v| v == "WATCH")
    }

    pub fn writes(&self) -> f64 {
        self.sum(|v| !matches!(v, "GET" | "LIST" | "WATCH"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_summed_by_verb_and_differenced() {
        let before = Requests::parse(
            "# TYPE apiserver_request_total counter\n\
             apiserver_request_total{code=\"200\",resource=\"leases\",verb=\"PATCH\"} 10\n\
             apiserver_request_total{code=\"200\",resource=\"pods\",verb=\"GET\"} 4\n",
        )
        .unwrap();
        let after = Requests::parse(
            "# TYPE apiserver_request_total counter\n\
             apiserver_request_total{code=\"200\",resource=\"leases\",verb=\"PATCH\"} 13\n\
             apiserver_request_total{code=\"409\",resource=\"leases\",verb=\"PATCH\"} 1\n\
             apiserver_request_total{code=\"200\",resource=\"pods\",verb=\"GET\"} 4\n\
             apiserver_request_total{code=\"200\",resource=\"pods\",verb=\"LIST\"} 2\n\
             apiserver_request_total{code=\"200\",resource=\"pods\",verb=\"WATCH\"} 1\n\
             apiserver_request_total{code=\"201\",resource=\"pods\",verb=\"POST\"} 5\n\
             # TYPE other_total counter\nother_total 99\n",
        )
        .unwrap();
        let d = after.since(&before);
        assert_eq!(d.writes(), 4.0 + 5.0);
        assert_eq!(d.reads(), 2.0);
        assert_eq!(d.watches(), 1.0);
    }
}
