//! PROTOCOL.md part 1, written once and run on every store (see `per_store!`).
//!
//! Scenarios on the shared relays assume the default settings (TUNNEL_MAXLEN 1000, backpressure on,
//! text/plain as the default type), also for an external relay at `BURROW_URL`; scenarios that need
//! other settings start a relay of their own.

mod auth;
mod consume;
mod pending;
mod produce;
mod replies;
mod routes;

use auth::*;
use consume::*;
use pending::*;
use produce::*;
use replies::*;
use routes::*;

per_store! {
    shared: [
        // produce
        produce_answers_201_with_id,
        message_ids_strictly_increase,
        produce_then_consume,
        missing_content_type_gets_default,
        content_type_round_trips_or_is_refused,
        binary_body_round_trips,
        limit_refuses_when_full,
        limit_zero_or_negative_disables_backpressure,
        limit_above_maxlen_is_400,
        limit_not_integer_is_400,
        expect_continue_is_http11s,
        // consume and long-poll
        consume_removes_message,
        consume_is_fifo,
        empty_tunnel_is_204,
        poll_timeout_zero_answers_at_once,
        poll_times_out_with_204,
        poll_takes_queued_message_at_once,
        poll_wakes_on_produce,
        bad_poll_timeout_is_400,
        polls_share_messages,
        poll_keeps_the_connection,
        half_closed_polls_lose_nothing,
        pipelined_requests_are_answered_in_order,
        // pending, status, len, clear
        pending_consume_redelivers_until_ack,
        pending_polls_share_a_new_message,
        ack_unknown_is_204,
        plain_consume_skips_pending,
        visibility_timeout_redelivers_late,
        bad_pending_is_400,
        status_codes,
        len_counts_pending,
        clear_removes_everything,
        ids_increase_across_clear,
        // replies
        reply_round_trip,
        reply_without_content_type_gets_default,
        reply_to_non_pending_is_204,
        reply_poll_wakes_on_reply,
        reply_poll_times_out,
        // routes, CORS, errors
        tunnel_id_length_limit,
        malformed_urls_are_400,
        trailing_slash_is_accepted,
        repeated_slashes_count_as_one,
        fixed_words_are_routes_or_tunnels,
        tunnel_ids_are_case_sensitive,
        wrong_method_is_405,
        health_demo_and_not_found,
        cors_headers_on_every_response,
        preflight_allows_requested_headers,
        error_bodies_are_one_line,
        requests_close_when_asked,
    ],
    dedicated: [
        poll_with_a_body_closes_after_answering,
        h2c_poll_wakes_on_produce,
        h2c_trailers_end_a_request,
        short_requests_are_answered,
        head_health,
        malformed_heads_are_refused,
        ambiguous_heads_are_refused,
        malformed_bodies_get_400,
        slow_heads_get_408,
        hung_up_heads_are_dropped,
        default_limit_is_maxlen,
        unlimited_produce_trims_to_maxlen,
        trimmed_pending_message_is_skipped,
        waiters_sleep_while_messages_are_out,
        backpressure_off_setting,
        default_content_type_setting,
        oversize_is_413,
        max_poll_timeout_caps_timeout,
        default_poll_timeout_setting,
        access_token_guards_tunnels,
        unreadable_heads_are_logged_without_their_bytes,
        auth_covers_every_tunnel_route,
        public_ids_are_open,
        signature_guards_produce,
    ],
}
